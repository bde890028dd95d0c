from fastdqn.bench.learner import main

main()
