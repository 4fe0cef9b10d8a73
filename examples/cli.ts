#!/usr/bin/env node
/**
 * The `pagemerge` command (the package's bin). Each command lives in examples/commands/ and is
 * added below. Exit status: 0 done, 1 failed, 2 bad usage; every error is one line on stderr.
 */
import { Command, CommanderError } from 'commander'
import { demoCommand } from './commands/demo'
import { estimateCommand } from './commands/estimate'
import { kernelCommand } from './commands/kernel'
import { packageManifest } from './dataset'
import { CliError, errorLine, EXIT_FAILURE, EXIT_USAGE } from './terminal'

const NAME = 'pagemerge'

function program(): Command {
  const cli = new Command(NAME)
    .description('Same-page merging (the idea of Linux KSM) for Node.js buffers: try it, and see what the kernel does.')
    .version(packageManifest().version, '-V, --version', 'print the version and exit')
    .option('--no-color', 'no colours (as NO_COLOR=1 does); colours are only used on a terminal')
    .showSuggestionAfterError(true)
    .addHelpText(
      'after',
      `
Examples:
  $ ${NAME} demo                      merge 4 tenants' copies of this package's files
  $ ${NAME} demo --tenants 8 --json   the same, as JSON
  $ ${NAME} kernel status             the kernel's KSM knobs and counters
  $ ${NAME} kernel watch              the same, every second
  $ ${NAME} estimate --all            what merging would free across processes
  $ ${NAME} help demo                 help for one command

Exit status: 0 done, 1 failed, 2 bad usage.`,
    )

  // The commands, one file each in examples/commands/.
  cli.addCommand(demoCommand())
  cli.addCommand(kernelCommand())
  cli.addCommand(estimateCommand())

  // Commander reports its own errors through outputError: fold each into one line (it puts a
  // "Did you mean" hint on a line of its own) that says where help is, and let main() choose the
  // exit status (exitOverride) instead of commander.
  const configure = (command: Command, path: string): void => {
    command.exitOverride().configureOutput({
      outputError: (text, write) => write(`${NAME}: ${text.replace(/^error: /, '').replace(/\s*\n\s*/g, ' ').trim()} (see '${path} --help')\n`),
    })
    for (const sub of command.commands) configure(sub, `${path} ${sub.name()}`)
  }
  configure(cli, NAME)
  return cli
}

async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv)
    return 0
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help and --version end with exit code 0; a command line commander rejects is bad usage.
      // Help asked for without a command (`pagemerge`, `pagemerge kernel`) has already been
      // printed to stderr: also bad usage.
      return err.exitCode === 0 ? 0 : EXIT_USAGE
    }
    process.stderr.write(`${NAME}: ${errorLine(err)}\n`)
    return err instanceof CliError ? err.exitCode : EXIT_FAILURE
  }
}

// Output written to a closed pipe (`pagemerge kernel watch | head`) ends the command quietly.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0)
  throw err
})

main(process.argv).then((code) => {
  process.exitCode = code
})
