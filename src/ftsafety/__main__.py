from ftsafety.cli import main

main()
