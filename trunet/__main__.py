"""``python -m trunet`` (and ``torchrun -m trunet``) runs the command line."""

from trunet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
