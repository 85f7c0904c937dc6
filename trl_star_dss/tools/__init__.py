"""The tools around the library: the `star-dss` command line, the toy-world demo, safety and capability evaluation,
the evaluation of a guard on prefixes, and dataset loading for the command line. `import trl_star_dss` loads none of
them.

As in `trl_star_dss.scoring`, torch, transformers, datasets, accelerate, PEFT, lm-eval and the trainer are imported
inside the functions that use them, so `star-dss --help` prints help without loading them."""
