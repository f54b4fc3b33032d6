"""`python -m qfinal`; `run` is also the console script's entry point."""


def run() -> None:
    from qfinal.checkpoint.interrupts import install

    install()  # before the imports below: a signal during them must exit 130 too (checkpoint/interrupts.py)
    from qfinal.cli.app import console

    console()


if __name__ == "__main__":
    run()
