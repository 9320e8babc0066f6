"""Scoring a program, trusted side: one stage (stage), the fitness rule over stages and seeds
(fitness), the judge and where it runs (judge, ray_runner), the sandbox, the ledger, the machine
(hardware), and the code that runs beside a child's code (sandboxed/). Imports nothing: a
sandboxed process imports this package on its way to sandboxed/."""
