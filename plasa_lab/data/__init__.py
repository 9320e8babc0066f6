"""Token caches: reading one (tokens, all a sandboxed worker needs), building one (corpora), and the
SmolLM tokenizer (tokenizer)."""
