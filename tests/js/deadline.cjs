// Preloaded into every node process the test suite starts (`node --require ./deadline.cjs …`):
// a hard deadline, DEADLINE_MS (default 30 s), after which the process exits with code 2
// whatever it is waiting for.
"use strict";

setTimeout(() => {
  process.stderr.write("deadline reached\n");
  process.exit(2);
}, Number(process.env.DEADLINE_MS || 30000)).unref();
