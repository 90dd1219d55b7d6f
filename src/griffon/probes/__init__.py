"""The Griffin paper's copying and retrieval probes (Section 6): tasks, training and evaluation."""
