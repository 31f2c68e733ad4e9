"""Built-in numpy/scipy engines that stand in for MotionCor2, CTFFIND and DoG picker.

Each engine is a console command whose flags, inputs and outputs follow the real tool, so the
pipeline runs them exactly as it runs the real binaries.
"""
