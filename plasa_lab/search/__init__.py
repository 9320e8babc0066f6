"""The evolution run: plan and start it (launch, run_config, llm_setup), run it (run), stop it
(stops), show it (progress), and the LLMs it asks (llm_client, or the offline mutator). Nothing
outside this package imports it (tests/test_structure.py)."""
