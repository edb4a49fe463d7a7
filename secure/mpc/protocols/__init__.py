"""The match protocols, as objects: a ``ScoreProtocol`` computes shares of the scores, a ``CompareProtocol`` turns
them into shares of the output (``base.py``).

Scores: ``naive_scores.NaiveScores`` (CrypTen's Beaver matmul, the baseline) and ``fixed_gallery.FixedGalleryScores``
(each row's mask opened once and reused). Comparison: ``crypten_compare.CrypTenCompare`` (CrypTen's circuit, the
baseline) and ``dealer_bits.DealerBitsCompare`` (the dealer-bits protocol of ``compare.py`` with the correlated
randomness of ``correlations.py``). Security argument: ``docs/security.md``.
"""
