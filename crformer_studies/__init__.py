"""Studies beside the library: research code that trains and measures many runs of crformer
(``python -m crformer_studies.ablation``: the paper's ablations and the language-fidelity probe).
Not part of the installed package; run from a checkout."""
