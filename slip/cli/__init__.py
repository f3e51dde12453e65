"""The library's command line: ``slip segment``, ``slip weights``, ``slip data``, training and evaluation.

:func:`slip.cli.app.add_library_commands` puts these commands on a typer root; ``producer.cli`` builds the
``slip`` console command from them and the queue's commands. Command modules import model code inside
their functions, so ``slip --help`` starts fast.
"""
