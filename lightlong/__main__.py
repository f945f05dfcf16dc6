from lightlong.cli import main

main()
