"""A program as text: its EVOLVE-BLOCKs and named schedules (blocks), what the static checks read
(source, allowlists, checks), and the LLM's system message written from those rules (prompting)."""
