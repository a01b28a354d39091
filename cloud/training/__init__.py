"""Training pipeline: simulated or recorded normal operation -> a signed model package.

``python -m cloud.training`` (also ``edgectl train``) runs it here and, unchanged,
as a SageMaker training job in script mode (``cloud/training/entry.py``).
Needs the ``train`` extra (torch); devices never import this package.
"""
