"""What the machine and the installation offer: installed extras, CPU features, worker processes and BLAS
threads. The lowest layer: it knows nothing of models."""
