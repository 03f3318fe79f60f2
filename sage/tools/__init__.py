"""Entry points beside the library: each module is a small `main(argv=None)` behind an argparse
parser (`python -m sage.tools.<name> --help`). The library (sage/*.py, sage/data/) carries no
argparse; the three training/evaluation scripts stay at the top of the checkout.

    quickstart   SynthAD -> facts -> MLE -> SFE -> E-DPO -> evaluation (README's main command)
    ablations    Table 3 rows and the N / K sweep (Fig. 7) at tiny scale
    synthad      generate the SynthAD benchmark          convert    import external data sets
    facts        fact sentences for SFE (and their cache) mle        judge sub-scores (Eq. 3)
    tokenizer    train the tiny preset's tokenizer        perception tiny InternViT pretraining
    pretrain     the tiny base VLM from scratch           plan       per-rank memory plan
    diagnose     teacher-forced diagnostics of a model    visualize  the patch selection (Eq. 1)
    bench.*      benchmarks that print figures (decode, load, topk_cosine, train_step)
"""
