"""HomeSpec's chat TUI (DESIGN §9): a Textual app that consumes engine events; it talks to ``homespec.engine`` and
``homespec.events`` and nothing else."""
