"""The code that runs inside the sandbox, beside or in place of a child's code: the trusted trunk
and validation, the untrusted worker, the probes and the wire protocol between them. It imports
only the contract, util, program.blocks, data.tokens and itself (tests/test_structure.py)."""
