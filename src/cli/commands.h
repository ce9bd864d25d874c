/* commands.h — the subcommands of the `quill` binary. Each takes the arguments after `quill`
 * (argv[0] is the command's name), prints its own usage on bad arguments, and returns the
 * process exit code (0 success, 1 failure, 2 usage error). */
#ifndef QUILL_COMMANDS_H
#define QUILL_COMMANDS_H

int cmd_random_model(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_detokenize(int argc, char **argv);
int cmd_chat_template(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_quantize(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_serve(int argc, char **argv);

#endif
