//! eni CNI plugin.
