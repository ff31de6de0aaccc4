"""`cai-ray classifiers`: constitutional classifiers, a guard that costs milliseconds.

From a constitution: synthetic requests and answers that violate or respect each principle
(engine pools), labelled by the AI judge, train an input classifier (the request) and an
output classifier (the answer, also its prefixes for streaming checks) on Ray Train; both are
measured on held-out synthetic rows and on the red-team and benign eval sets. The serve guard
(``guard: classifier``) reads the output folder. Like the pipeline it composes other steps'
parts (eval's engine stages, the train step's harness), so it sits in the entry layer.
"""
