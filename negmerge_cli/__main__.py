"""``python -m negmerge_cli`` runs the command-line tool."""

from negmerge_cli.cli import main

main()
