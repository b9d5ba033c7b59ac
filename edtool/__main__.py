from edtool.cli import main

main()
