//! Deterministic turmoil simulations of whole clusters (DESIGN.md §11); they arrive with issue 5.
