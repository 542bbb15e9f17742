"""`python -m healthyluncher`: the `luncher` command."""

from healthyluncher.cli import main

main()
