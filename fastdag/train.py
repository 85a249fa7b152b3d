"""Entry point for launchers: ``deepspeed fastdag/train.py --config X`` (or ``python fastdag/train.py ...``)."""
import os
import sys

if __name__ == "__main__":
    # Run as a script, this file's directory heads sys.path; drop it so fastdag's modules are only seen as a
    # package and the repository root (its parent) is importable without an install.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))
    from fastdag.cli import train_main

    sys.exit(train_main(prog="fastdag/train.py"))
