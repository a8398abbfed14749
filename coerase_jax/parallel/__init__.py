"""One device mesh with named axes, a small rules table for parameter shardings, batch shardings."""
