"""One module per `automix-fast` command (train, eval, export, visualize, models), each with a
`run(args) -> exit status`; `automix_fast.cli` builds the parser and dispatches. Shared pieces:
`common` (a trained policy rebuilt from a checkpoint, its evaluation data) and
`automix_fast.rundir` (the run folder)."""
