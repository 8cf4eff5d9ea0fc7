"""The recommender: data loading and synthesis, HSTU and SASRec with incremental state, training, metrics."""
