from qfinal.cli.app import console

console()
