"""The cost instrument: estimated cycles of a program on one core of a CPU we do not have.

A guest program runs under Debian's dynamic qemu-user with our counting plugin
(:mod:`.plugin`, :mod:`.counting`); every translated block executed inside the program's
measured region is weighed with llvm-mca for the chosen core (:mod:`.mca`); blocks are mapped
to ``model.so`` symbols for a per-kernel table (:mod:`.symbols`). :func:`.estimate.estimate_cycles`
puts it together. The model is one core's pipeline: no caches, no memory bandwidth, no branch
misses, no other cores.
"""
