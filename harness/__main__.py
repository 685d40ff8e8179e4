from harness.launcher import main

main()
