"""What is pruned at a level: the numpy reference (`reference`) and the device
criteria that equal it (`magnitude`, `nm`, `channel`), all one `Criterion` protocol."""
