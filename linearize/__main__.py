from linearize.cli.main import main

main()
