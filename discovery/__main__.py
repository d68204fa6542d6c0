from discovery.cli.app import main

main()
