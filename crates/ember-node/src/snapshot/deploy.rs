//! Runs of snapshot deployments on a node.
