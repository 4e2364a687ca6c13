"""Quality tooling on top of the engine: tasks with exact checkers (:mod:`.tasks`), training tiny models
(:mod:`.train`), measuring accuracy and speed (:mod:`.evaluate`), the quality/speed sweep (:mod:`.sweep`) and the
trained models shipped with the package (:mod:`.zoo`)."""
