// Prints vitest's result as one plain closing line, "tests: N passed, N failed, N skipped", and
// exits non-zero on any failure or when no test ran. `--clean` removes a stale report first.
import { existsSync, readFileSync, rmSync } from 'node:fs';
const file = 'test-results.json';
if (process.argv[2] === '--clean') {
  rmSync(file, { force: true });
  process.exit(0);
}
if (!existsSync(file)) {
  console.log('tests: 0 passed, 1 failed (vitest wrote no report)');
  process.exit(1);
}
const r = JSON.parse(readFileSync(file, 'utf8'));
const skipped = (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
const failed = r.numFailedTests + (r.numFailedTestSuites ?? 0);
console.log(`tests: ${r.numPassedTests} passed, ${failed} failed, ${skipped} skipped`);
process.exit(failed > 0 || r.numTotalTests === 0 || r.success === false ? 1 : 0);
