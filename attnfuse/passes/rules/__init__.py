"""The rewrite rules, written once for both front-ends (see core/rule.py), in the order they run."""
