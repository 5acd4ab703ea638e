from loadtests.gpu_bench.cli import main

main()
