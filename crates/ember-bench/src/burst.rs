//! `ember bench burst` (being moved here from the CLI).
