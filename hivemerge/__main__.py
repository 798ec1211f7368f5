from hivemerge.node.cli import main

main()
