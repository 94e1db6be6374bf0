from sapf.cli import main

main()
