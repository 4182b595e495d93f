"""The command-line tools beside training, each a ``main(argv)`` run by ``python -m lit_distill <command>`` (the table
is :data:`lit_distill.cli.COMMANDS`)."""
