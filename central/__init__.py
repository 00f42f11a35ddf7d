"""sohoa central: the aggregator that receives, verifies, stores and indexes documents from edges.

It imports ``protocol`` and never ``edge``; ``sohoa`` (the composition root) imports it.
"""
