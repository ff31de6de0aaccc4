"""Collective constitutions: principles the public agreed with, from a Polis vote.

`cai-ray constitution collect` runs these steps in order, one module each:

    polis.py           read comments.csv and votes.csv (or participants-votes.csv): the
                       statements, each voter's last vote on each, and the rows rejected
    opinion_groups.py  the voter × statement matrix → PCA → k-means, k by silhouette
    consensus.py       group-aware consensus: P(agree) in every group, and their product
    collect.py         keep the statements every group agreed with, write them as a
                       constitution with provenance, validate it with the loader

Collective Constitutional AI (Anthropic and the Collective Intelligence Project, 2023) ran
this with Polis; the math is Polis's (Small et al. 2021, "Polis: Scaling deliberation by
mapping high dimensional opinion spaces").

`cai-ray constitution derive` finds principles in preference pairs instead (Inverse
Constitutional AI, Findeis et al. 2024):

    preference_pairs.py  read the pairs, split off the held-out ones, cluster the rest by the
                         words that tell the chosen reply from the rejected one
    derive.py            the engine drafts a principle per cluster; every candidate is scored by
                         how well the labeler using it alone reconstructs the held-out pairs; the
                         best become a constitution with their accuracy and provenance
"""
