from fastdqn.bench.train import main

main()
