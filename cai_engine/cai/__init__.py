"""The Constitutional AI method: constitution, prompt formats, the critique loop, AI feedback, multiple-choice scoring."""
