from hivemerge.node.cli.app import main

main()
