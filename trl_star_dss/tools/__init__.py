"""The tools around the library: the `star-dss` command line, the toy-world demo, safety and capability evaluation,
the evaluation of a guard on prefixes, and dataset loading for the command line. `import trl_star_dss` loads none of
them."""
