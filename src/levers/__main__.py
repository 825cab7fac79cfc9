from levers.cli.entry import main

main()
