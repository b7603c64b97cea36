"""``python -m fleetlm`` runs the command line, like the ``fleetlm`` script."""

from fleetlm.cli import main

main()
